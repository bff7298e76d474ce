from egg_eval.cli import hydra_main

if __name__ == "__main__":
    hydra_main()
