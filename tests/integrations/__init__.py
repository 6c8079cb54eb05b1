"""Tests of autobatch.integrations: the Hugging Face Trainer and Lightning, on the CPU's emulated device."""
