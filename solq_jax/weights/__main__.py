"""`python -m solq_jax.weights --checkpoint X.pth --config CONFIG --out DIR [--torchvision]`:
converts official SOLQ (or torchvision ResNet) weights into a converted directory."""
from solq_jax.weights import convert

if __name__ == '__main__':
  convert.main()
