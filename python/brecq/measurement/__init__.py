"""Resource measurement: parameters, storage, memory and latency of a causal LM (``measure``),
packed against dense layer timings side by side (``speed``), and the statistics that keep latency
comparisons honest (``timing``)."""
