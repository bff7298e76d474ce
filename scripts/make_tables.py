"""The paper's Tables 1-6 from results/runs: ``python scripts/make_tables.py [--results results]``.

The same as ``python -m egg_eval.tables`` (``make tables``); see egg_eval/tables.py.
"""

from egg_eval.tables import main

if __name__ == "__main__":
    main()
