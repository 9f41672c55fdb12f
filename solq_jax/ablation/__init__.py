"""The paper's ablations (Table 3) as runnable sets of variants: `python -m solq_jax.ablate`.

variants.py  overrides, their product, what a variant needs before training (coder files)
report.py    the logged evaluations -> the Table 3 markdown, results.json and the chart
chart.py     AP-vs-step line charts (Pillow)
"""
