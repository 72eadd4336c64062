"""cpu: one file per operator."""
