from dubhe.cli import main

main()
