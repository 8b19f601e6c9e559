"""Built-in cluster providers, registered through the ``velo`` entry-point group."""
