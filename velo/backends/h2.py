"""HTTP/2 CONNECT tunnel backend (work in progress)."""
