"""Graph passes: find conv call sites, instrument them, fold branches, strip instrumentation."""
