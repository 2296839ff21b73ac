"""The fast path, opt-in (`SamplingParams(compile=True)`, `unimodal sample --compile`): an own image-decoding
loop on the library's static cache, compiled once (`decode`), and host tuning for sampling processes (`host`)."""
