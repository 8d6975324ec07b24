"""The method itself, in pipeline order: ``candidates`` (the DAM grid) -> ``gates`` (its relaxation) -> ``search``
(bi-level optimisation, with ``second_order``) -> ``export`` (a stock PEFT model of the kept modules)."""
