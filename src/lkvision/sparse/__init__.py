"""lkvision.sparse"""
