"""The application: a fine-tuning run from its settings, and the commands around it.

``task`` (the one training task), ``dcot`` (per-step prompts), ``config`` (``TrainConfig``:
every knob), ``run`` (a run from a config), ``cli`` (``halforder train``), ``plan_choice``
and ``plan_cli`` (``--estimator auto``, ``halforder plan``), ``export_cli``
(``halforder export``), ``diagnose_cli`` (``halforder diagnose``), ``previews`` (sample grids
and GIFs). The top layer of :mod:`halforder.diffusion`: it builds on the chain machinery,
the models and the rewards, and none of them imports it.
"""
