import sys

from device_sim.host import host_main

sys.exit(host_main())
