"""One module per tab of the dashboard (the Study tab: study.py; the overview, the inputs and the Runs tab
are in ``ui/callbacks.py``). Each is a mixin of :class:`vlmlens.ui.callbacks.Dashboard`, which provides
``entry``, ``holder``, ``lm_for``, ``timings``, the prefetch pool and the export folders."""
