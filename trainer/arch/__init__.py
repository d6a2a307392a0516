"""Original-architecture networks (EDM's SongUNet / DhariwalUNet, EDM2's magnitude-preserving U-Net)."""
