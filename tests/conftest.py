import sys
from pathlib import Path

# tiny_models.py and other test helpers live beside the tests
sys.path.insert(0, str(Path(__file__).parent))
