import sys

from device_sim.fleet import device_main

sys.exit(device_main())
