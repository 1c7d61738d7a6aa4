"""Files in and out: calibration and evaluation text, the bundled assets, staged atomic outputs, the
JSON report, saved model folders and their source files, the dense-perplexity cache.
May import: prac.parallel and everything below it.
"""
