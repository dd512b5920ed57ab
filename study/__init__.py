"""Recipe studies on top of pretrain and quant: ``python -m study`` runs a plan, ``python -m
study.report`` turns its result files into the report (study.plan says what a plan holds)."""
