"""Document hooks of the local lm-eval tasks (loaded by lm-eval from the task YAMLs)."""
from data_prep.documents import EVAL_DIR

PIQA_LABELS = EVAL_DIR / "piqa" / "valid-labels.lst"


def piqa_with_labels(dataset):
    """PIQA ships its labels in a separate line-aligned file; attach them as ``label``."""
    with open(PIQA_LABELS) as f:
        labels = [int(line) for line in f if line.strip()]
    if len(labels) != len(dataset):
        raise ValueError(f"{PIQA_LABELS}: {len(labels)} labels for {len(dataset)} PIQA examples")
    return dataset.map(lambda doc, i: {"label": labels[i]}, with_indices=True)
