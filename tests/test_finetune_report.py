"""The fine-tuning report's text: the number of parallel runs is written as a number, and a
one-seed run with tiny rewards (the --quick one) shows its values and no NaN interval."""
import importlib
import os
import sys
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report():
    sys.path.insert(0, ROOT)
    return importlib.import_module("experiments.finetune_report")


def test_a_one_seed_table_shows_small_values_and_no_nan(tmp_path):
    report = _report()
    cfg = SimpleNamespace(budget=96, T=4, eta=0.1, batch=2, seeds=(0,), target=SimpleNamespace(scale=0.1), n_var=8)
    ref = dict(data_reward=3.2e-5, data_circle=0.5, data_diversity=0.01, data_off_data=0.2)
    gv = dict(FO=1.0, HO=0.0, ZO=2.0, total=3.0)
    row = dict(label="unbiased", pairing="none", lr=1e-3, lr_position="interior", steps=3, activation_mb=0.5,
               cost=dict(forward=4, backward=1, graph_steps=1), per_sample=5.0, grad_var=gv,
               **{k: report._ci([v]) for k, v in dict(auc=2.5e-5, reward=1.25e-5, circle=0.5, diversity=0.02,
                                                       off_data=0.3, seconds=4.0).items()})
    path = tmp_path / "table.md"
    report.write_table({"full": row}, SimpleNamespace(cfg=cfg, reference=ref), str(path), [], jobs=2)
    text = path.read_text()
    assert "{jobs}" not in text and "2 run(s) at a time" in text
    assert "nan" not in text and "0.000 ±" not in text
    assert "**2.5e-05 ± n/a**" in text and "| 1.25e-05 ± n/a |" in text and "reward 3.2e-05" in text
    assert report.interval((0.51234, 0.0123)) == "0.512 ± 0.012"          # three decimals where they show the value
    assert report.interval((-0.004, float("nan")), sign=True) == "-0.004 ± n/a"
