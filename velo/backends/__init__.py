"""Built-in tunnel backends.  Each module is a plugin registered through the
``velo`` entry-point group, exactly as a third-party backend would be."""
