from services.embedder.service import EmbedderService

__all__ = ["EmbedderService"]
