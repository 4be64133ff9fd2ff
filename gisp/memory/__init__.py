"""Memory plans, before anything is loaded: bytes per device of a scoring pass (`gisp.memory.scoring`) and of a
recovery's training step (`gisp.memory.training`), from the model's config alone, built on the meta device
(`gisp.memory.shapes`). `python -m gisp.plan` prints a run's plan; every gradient run and every recovery logs its own
and refuses, before loading, what does not fit the visible devices.
"""
