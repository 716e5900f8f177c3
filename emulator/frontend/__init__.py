"""Front ends: the ``aperture`` command, its human output, doctor, benchmarks and the pytest plugin."""
