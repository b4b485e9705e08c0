"""What tests and benchmarks measure us against: an exactly solvable diffusion problem (:mod:`.analytic`) and the
peer implementations with our weights (:mod:`.diffusers_interop`, which ``scripts/convert.py`` also uses to write
diffusers folders). Sampling never imports this package."""
