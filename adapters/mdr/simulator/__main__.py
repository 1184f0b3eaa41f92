"""Entry point of `python -m mdr_connector.adapters.mdr.simulator`, which runs the MDR simulator."""

from mdr_connector.adapters.mdr.simulator.app import main

if __name__ == "__main__":
    raise SystemExit(main())
