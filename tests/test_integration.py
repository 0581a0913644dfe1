"""End to end on a real capture: Run -> analyses -> figures, by their public names."""
import numpy as np
import pytest

import vlmlens as vl
import vlmlens.figures as F
from vlmlens.analysis import geometry as G

from tests._models import random_lm


@pytest.fixture(scope="module")
def run(image):
    return vl.capture(random_lm("llava"), image, "What is in the image?", max_new_tokens=6)


def test_dynamics_on_a_capture(run):
    L = run.n_layers
    df = G.dynamics(run)
    img = df[(df.metric == "entropy") & (df.span == "image")].sort_values("layer")
    assert list(img.layer) == list(range(L + 1))
    # the table holds exactly what the metric gives on the run's own states
    X = run.span_states("image")
    assert np.allclose(img.value.to_numpy(), [G.entropy(X[l]) for l in range(L + 1)], atol=1e-6)
    assert np.allclose(G.per_layer(run, G.entropy, span="text"),
                       [G.entropy(run.span_states("text")[l]) for l in range(L + 1)], atol=1e-6)
    cos = df[(df.metric == "cosine_distance") & (df.span == "image")].dropna().sort_values("layer")
    assert np.allclose(cos.value.to_numpy(), G.cosine_distance(X), atol=1e-6)


def test_every_figure_name_resolves():
    for name in F.__all__:
        assert callable(getattr(F, name)), name


def test_dynamics_figure_traces(run):
    fig = F.fig_dynamics(run)
    names = {t.name for t in fig.data}
    assert {"image", "text"} <= names
    ent = [t for t in fig.data if t.name == "image" and len(t.x) == run.n_layers + 1]
    assert ent, "an image curve spans all L+1 layers"
    sim = F.fig_layer_similarity(run, span="image")
    z = np.asarray(sim.data[0].z, dtype=float)
    assert z.shape == (run.n_layers + 1, run.n_layers + 1) and np.allclose(np.diag(z), 1.0, atol=1e-5)
