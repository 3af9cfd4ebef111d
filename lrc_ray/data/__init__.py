"""Data layer: MSD-layout data sets, CT volumes, the built-in synthetic abdomen."""
