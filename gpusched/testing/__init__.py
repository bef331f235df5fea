"""Fakes for tests and the demo: FakeClock, FakeNvml, the fake TAO task. Never imported by
library code outside this package."""
