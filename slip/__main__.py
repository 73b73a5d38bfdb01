"""`python -m slip ...`, and under DeepSpeed's launcher `deepspeed --module slip profile step ...`."""
import sys

from slip.main import main

sys.exit(main())
