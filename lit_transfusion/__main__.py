from lit_transfusion.cli import main

if __name__ == "__main__":
    main()
