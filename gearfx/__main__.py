from gearfx.cli import main

main()
