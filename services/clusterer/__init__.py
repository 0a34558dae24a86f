from services.clusterer.service import ClustererService

__all__ = ["ClustererService"]
