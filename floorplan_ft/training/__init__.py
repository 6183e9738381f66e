"""Phase 6: fine-tuning backends, evaluation, and the tiny offline models of the demo and tests."""
