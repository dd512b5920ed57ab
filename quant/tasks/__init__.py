"""Local lm-eval task configs (YAML) over the shipped evaluation files in data/eval."""
TASKS = ("lambada_openai", "piqa", "arc_easy")
