"""lkvision.bench"""
