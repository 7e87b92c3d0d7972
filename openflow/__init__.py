"""OpenFlow 1.3 with the Nicira extensions ovsflow needs: a sans-IO codec and a thin asyncio
connection. Standalone: it never imports ovsflow."""
