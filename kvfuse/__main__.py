from kvfuse.cli import main

main()
