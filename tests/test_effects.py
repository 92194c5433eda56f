"""Effects beyond main effects (tasks/effects.py) on a synthetic factorial sweep with a planted interaction: the
ANOVA ranks the interaction first with p < 0.05, Tukey's HSD names the cell that breaks the pattern, and the
sweep report carries the section; a sweep with nothing to test gets none."""
import numpy as np

from tasks.effects import effects, effects_lines, pairwise
from tasks.report import write_report


LOW = {("xavier", "relu"), ("kaiming", "tanh")}


def planted(seeds: int = 4) -> list[dict]:
    """init x activation crossed: xavier with relu and kaiming with tanh at 0.80, the other two at 0.90 (neither
    factor matters alone, their combination does), plus seed noise."""
    rng = np.random.default_rng(0)
    rows = []
    for init in ("xavier", "kaiming"):
        for act in ("relu", "tanh"):
            for s in range(seeds):
                acc = (0.80 if (init, act) in LOW else 0.90) + rng.normal(0, 0.005)
                rows.append({"cell": f"{init},{act},{s}", "levels": {"init": init, "activation": act, "seed": s},
                             "seed": s, "status": "FINISHED", "test_accuracy": acc, "history": {}})
    return rows


def test_a_planted_interaction_ranks_first_and_its_odd_cell_is_named(tmp_path):
    found = effects(planted(), ["init", "activation"], "test_accuracy")
    assert found[0]["effect"] == "init × activation" and found[0]["p"] < 0.05 and found[0]["eta2"] > 0.9
    assert {e["effect"] for e in found} == {"init", "activation", "init × activation"}
    assert all(e["eta2"] < 0.01 for e in found[1:])  # neither factor alone explains much
    low = {f"init={i} · activation={a}" for i, a in LOW}
    pairs = pairwise(planted(), ["init", "activation"], "test_accuracy")
    assert len(pairs) == 4 and all(len(low & {p["a"], p["b"]}) == 1 for p in pairs)  # every low cell vs every high
    paths = write_report("planted", planted(), ["init", "activation"], "test_accuracy", tmp_path)
    md = paths["md"].read_text()
    assert "## Effects and interactions" in md and "matters (p = " in md


def test_nothing_to_test_gives_no_section():
    one_seed = [r for r in planted() if r["seed"] == 0]  # one run per cell: no residual
    assert effects(one_seed, ["init", "activation"], "test_accuracy") == []
    assert effects_lines(one_seed, ["init", "activation"], "test_accuracy") == []
