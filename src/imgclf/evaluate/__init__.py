"""Evaluation of finished runs: metrics (`metrics`), error analysis and figures (`analysis`),
`imgclf evaluate` (`evaluate`) and the self-contained HTML reports (`report`).

Nothing is imported here, so `import imgclf.evaluate.metrics` stays light (numpy only).
"""
