"""smallNORB data: the raw binary format, the HDF5 cache, transforms, viewpoints, a synthesizer."""
