"""Paper B's four pruning settings (docs/theory.md §6), shared by pruning_depth and pruning_search."""

import jax

from iclsim import train


PRUNING_SETTINGS = ("matched", "noisier test labels", "other context length", "finite task pool")


def pruning_setup(s: dict, seeds, progress=print):
    """Paper B's four settings (docs/theory.md §6) on a trained L-layer linear transformer: returns the model and,
    per setting, (trained params per seed, test design, test n). The first three share the model
    trained on IID prompts; the fourth is trained on a finite pool of tasks and tested on fresh tasks."""
    from iclsim import IID, TaskPool, models
    from iclsim.train import TrainConfig

    d, n = s["dim"], s["n"]
    model = models.LinearTransformer(d, s["layers"], mlp=s["mlp"])
    cfg = TrainConfig(s["steps"], s["batch"], s["lr"])
    base = IID(d, noise_var=s["noise_var"])
    trained = {}
    for name, design in [("iid", base), ("pool", TaskPool(d, s["num_tasks"], s["noise_var"]))]:
        progress(f"  training a {s['layers']}-layer linear transformer on {name} prompts ({len(seeds)} seeds)")
        fitted = train.fit_sweep(model, design, [n], seeds, cfg)
        trained[name] = [jax.tree_util.tree_map(lambda a: a[0, 0, k], fitted.params) for k in range(len(seeds))]
    settings = {
        "matched": (trained["iid"], base, n),
        "noisier test labels": (trained["iid"], IID(d, noise_var=s["test_noise_var"]), n),
        "other context length": (trained["iid"], base, s["test_n"]),
        "finite task pool": (trained["pool"], base, n),
    }
    return model, settings
