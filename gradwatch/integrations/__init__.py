"""Optional integrations with other training frameworks, each importing its framework lazily.

* :mod:`gradwatch.integrations.transformers`: ``GradWatchTrainerCallback`` for the Hugging Face
  ``Trainer`` (``pip install "gradwatch[transformers]"``).

Lightning has its own module, :mod:`gradwatch.lightning`.
"""
