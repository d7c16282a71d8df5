from dstack.cli.entry import main

main()
