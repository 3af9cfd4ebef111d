"""The Ray layer: thin wrappers around the plain functions. The only code that imports `ray`."""
