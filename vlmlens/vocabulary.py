"""The words and numbers a user writes or picks -- cut modes, the cliff rule's tau, VTW's eta, the
written form of pruning methods -- in a module that imports nothing, so that the command line's
``--help`` and the dashboard's labels read them without loading torch. The modules that act on
them (interventions.core, experiments.cliff / pruning / methods) import them from here."""

TRUNCATE_MODES = ("drop", "remove")
#: how a sweep cuts the image from layer k on: Truncate's modes, or Freeze (the one list of them)
CUT_MODES = (*TRUNCATE_MODES, "freeze")

#: the cliff rule's first-token KL threshold (nats)
DEFAULT_TAU = 0.1
#: VTW's threshold for a 7B model (20 calibration samples); small models may need a looser one
VTW_ETA = 0.003

METHOD_SYNTAX = ("comma-separated: fastv:K:R, random:K:R, l2:K:R, pdrop:L1/L2/..:R1/R2/.., vtw:K, adaptive:SHARE, "
                 "stages:R, patch:R:SCORE, fastervlm:R, divprune:R, dart:K:R, downsample:R (K a decoder layer; R the fraction KEPT, in (0, 1] -- or say which: "
                 "keep=0.25, or drop=0.75 as the FastV paper's R, the fraction dropped; percentages work: drop=75%; "
                 "fastv:K:R:step re-ranks at every step as FastV's evaluation, fastv:K:R:prefill (default) once; "
                 "stages: VisiPruner's treatments of the causal stages, top R in fusion; patch: only R of the patches "
                 "reach the language model, SCORE grid, random, l2, cls or divprune; fastervlm:R = patch:R:cls "
                 "(the vision tower's [CLS] attention), divprune:R = patch:R:divprune (a diverse subset); dart:K:R: from layer K the image tokens least "
                 "duplicating 4 image and 4 text pivots (DART); downsample:R: a smaller image with R of the "
                 "image tokens, where the processor's token count follows the image size), or 'default'")

#: the heatmaps checked against causal effects (vlmlens.experiments.map_check), and its defaults
MAP_KINDS = ("attention", "LLaVA-CAM", "patch lens")
MAP_STEPS = 8
MAP_RANDOM = 19          # random orders: the smallest p-value is then 1 / 20 = 0.05
MAP_MAX_FORWARDS = 400
