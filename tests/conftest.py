import os
import sys

# Tests import the shared tiny models as a plain module.
sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
