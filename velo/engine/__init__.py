"""The client-side runtime: tunnel supervisor, reconciler, control socket."""
