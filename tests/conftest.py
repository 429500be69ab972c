import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
# scripts/coverage.py: its checks of the onnx backend models, and its wrap of a whole input as one sample
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts"))
