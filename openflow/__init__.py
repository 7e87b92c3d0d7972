"""OpenFlow 1.3 and 1.5 with the Nicira extensions a controller of Open vSwitch needs: a
sans-IO codec (`messages`, `oxm`) and a thin asyncio connection (`connection`). Standalone: it
never imports ovsflow."""
