from aperture.emulator.frontend.cli import main

main()
