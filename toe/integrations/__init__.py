"""Glue between ToE and training frameworks. Each integration lives in its own module and imports its
framework only when that module is imported (``toe.integrations.hf`` needs Hugging Face transformers)."""
